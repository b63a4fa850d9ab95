from fastlb.cli import main

raise SystemExit(main())
