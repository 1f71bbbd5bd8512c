"""Reading and writing pools and their side files: input readers, DataComp metadata and
``.npz`` vectors, the ``uids.npy`` format, uid keys, partitioned statistics over Parquet."""
