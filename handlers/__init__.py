"""HTTP handlers: parse and validate, one service call, return a representation."""
