"""Pure domain rules: states, policies and image references. No I/O here."""
