"""The local stack for `recgw dev` / `make run` and the tests: OpenBao and moto."""
