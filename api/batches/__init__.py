"""OpenAI's Batch API.

- `service`: create, retrieve, list and cancel, on a batch's row;
- `lines`: one input line validated (in the parsing processes), and the typed input and output
  line records;
- `ingest`: a batch's input file read into jobs and line errors, then dispatched;
- `finalize`: the output and error files of a batch whose jobs have ended;
- `loop`: finalizing and expiring, in every API process.
"""
