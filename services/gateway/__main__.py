import sys

from services.common.server import main
from services.gateway.service import SERVICE

sys.exit(main(SERVICE))
