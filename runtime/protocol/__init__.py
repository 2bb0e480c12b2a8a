"""Codecs between wire formats and the protocol-neutral types. No I/O here."""
