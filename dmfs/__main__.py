from dmfs.cli import main

raise SystemExit(main())
