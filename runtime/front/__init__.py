"""The front process: the async engine over the scheduler and detokenizer processes (it starts,
watches and stops them), the tokenizer manager (validate, tokenize, assemble results) and the
data-parallel router."""
