"""Data curation: raw documents -> filtered, deduplicated, decontaminated token shards."""
