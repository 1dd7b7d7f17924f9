"""Model files: references (`refs`), GGUF names and shards (`names`), GGUF headers read
locally or over HTTP ranges (`header`), the Hugging Face hub (`session`, `listing`,
`transfer`, `verify`, `pull`) and its cache on disk (`cache`)."""
