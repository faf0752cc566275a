import sys

from services.common.server import main
from services.processor.service import SERVICE

sys.exit(main(SERVICE))
