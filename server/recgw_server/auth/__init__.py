"""Who may call what: bearer tokens and their roles."""
