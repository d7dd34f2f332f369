from llm_service.cli import main

raise SystemExit(main())
