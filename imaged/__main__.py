from imaged.cli.main import main

raise SystemExit(main())
