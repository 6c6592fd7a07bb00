"""The detokenizer: incremental decoding with stop strings (`decode_state`) and the process that
runs it between the scheduler and the front (`process`)."""
