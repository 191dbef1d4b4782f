"""Forgetting-prevention methods: small plugins with one interface (see `base.Method`)."""
