from lwq_gguf.cli.main import run

raise SystemExit(run())
