from featurescribe.cli import main

raise SystemExit(main())
