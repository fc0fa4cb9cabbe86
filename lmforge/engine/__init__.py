"""The serving engine: paged KV blocks, a continuous-batching scheduler, schedule -> execute -> update."""
