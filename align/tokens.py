"""Constants about token ids that every layer shares; imports nothing."""

# The label of a token the loss skips: prompt tokens, padding. -100 is the value torch's
# cross_entropy ignores by default and the one transformers' collators write.
IGNORE_INDEX = -100
