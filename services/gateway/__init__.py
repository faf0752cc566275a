"""Gateway service: plans jobs into stage DAGs, routes stages to workers, streams progress."""
