from resfast.cli import main

raise SystemExit(main())
