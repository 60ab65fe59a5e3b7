"""Tenant credentials: the interfaces in `base`, Vault/OpenBao in `vault`."""
