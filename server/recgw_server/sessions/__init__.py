"""Durable upload sessions: the contract in `base`, one module per implementation."""
