"""The results ledger: where a sweep's files live, what a row holds, and how it is written and read.

- ``storage``: a root on a local disk, S3 or GCS, with one atomic write.
- ``layout``: every path and file name under the root.
- ``schema``: the one Arrow schema of a result row.
- ``rows``: writing a row, reading the dataset (``load_results``), the experiment record.
- ``done``: which cells a storage root already holds, the ledger a rerun consults.

Nothing here imports Ray or torch.
"""
