"""data_prep: raw text -> tokens -> mosaicml-streaming MDS shards (`python -m data_prep --help`)."""
