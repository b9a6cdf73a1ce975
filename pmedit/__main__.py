from pmedit.cli import main

raise SystemExit(main())
