import sys

from services.common.server import main
from services.denoiser.service import SERVICE

sys.exit(main(SERVICE))
