from tinyllama_mcp.server.cli import main
import sys

sys.exit(main())
