from imaged.cli import main

raise SystemExit(main())
