"""The demo and its pieces (task, training loop, model loaders, reports), importable as
`examples.<module>` by tests and benchmarks; each script also runs as
`python examples/<script>.py`. Never imported by the library packages."""
