"""The `baton` command: one small module per verb."""
