from cmbagent_batch.cli import main

raise SystemExit(main())
