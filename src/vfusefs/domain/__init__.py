"""Pure decisions and bookkeeping: who may do what (`access`), the quota ledger and sizes
(`quota`), and what the control API hands in (`validation`: ids, scopes, limits, grants).
Nothing here does I/O, awaits, or knows about FUSE, the store or native storage, so every rule
can be tested exhaustively without a mount."""
