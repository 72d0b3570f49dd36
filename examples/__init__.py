"""Examples of producers built on the ``producer`` client."""
