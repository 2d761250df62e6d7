# The User model is registered by django.contrib.auth's own admin.
