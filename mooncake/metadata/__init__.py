"""Metadata plugins (entry-point group ``mooncake.metadata``): where segment descriptors live."""

from mooncake.metadata.base import MetadataStore, parse_metadata_server

__all__ = ["MetadataStore", "parse_metadata_server"]
