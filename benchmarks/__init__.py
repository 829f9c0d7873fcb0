"""Benchmark scripts (`python benchmarks/<name>.py`) and their shared CSV helpers
(`benchmarks.common`). Never imported by the library packages."""
