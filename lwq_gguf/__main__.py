from lwq_gguf.cli import main

raise SystemExit(main())
