class NcpError(ValueError):
    """Bad input or configuration; the message names the file, row or key at fault."""
