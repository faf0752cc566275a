import sys

from services.common.server import main
from services.interposer.service import SERVICE

sys.exit(main(SERVICE))
