"""What the model is: its config, its checkpoint's tensor index, its skeleton (blocks in
execution order, built on the meta device) and the memory each block needs at run time."""
