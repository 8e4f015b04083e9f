"""OpenAI's wire types, owned by Ferry: `requests` (what clients send), `responses` (the
completion, its chunks, errors), `resources` (models, stored completions, files, batches)."""
