"""TVM Relax compiler flow of tvm-winoq (placeholder; filled below)."""
