"""KV-cache quality simulation (research code for docs/quality-levers.md).

``codecs``: block encoders/decoders in numpy (the shipped kv* codec bit for bit,
ggml's q4_0/q8_0, and the levers); ``squat``: SQuat's factor and encoder;
``attention``: upstream's Hadamard rotation and the attention-error metrics;
``levers``: the named K/V encoders the study compares, with honest bits/value.
"""
