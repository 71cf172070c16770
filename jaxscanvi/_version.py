__version__ = "0.1.0"

# Version of the on-disk model format. Bump when a saved folder written by an
# older release can no longer be read as is; io.load names both versions.
FORMAT_VERSION = 1
