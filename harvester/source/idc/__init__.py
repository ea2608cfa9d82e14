"""Imaging Data Commons' public buckets: the index (``index``), an anonymous S3 client (``s3``)
and the ``Source`` (``source``)."""
