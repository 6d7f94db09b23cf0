"""The command line: parses strings at the edge, calls the library, prints."""
