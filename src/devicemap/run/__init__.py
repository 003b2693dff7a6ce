"""How a loaded model executes: hooks where the device changes (dispatch), inputs moved to
each block (mover), offloaded blocks fetched ahead of need (offload, pages) and streaming
generation."""
