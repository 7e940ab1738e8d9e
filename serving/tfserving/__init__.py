"""What TF Serving defines, as Scribe's programs speak it: its messages and their tensors, its
config files, its version folders and warmup records, its session loader and its batcher.

The gateway, the model server and training import this package; it imports none of them, and
nothing here imports TensorFlow except the session loader (the gateway runs without it)."""
