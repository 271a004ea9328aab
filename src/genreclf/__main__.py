from genreclf.cli import main

raise SystemExit(main())
