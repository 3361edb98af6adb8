package local.fhircharge.hapitest;

import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.api.model.ExpungeOptions;
import ca.uhn.fhir.jpa.searchparam.registry.SearchParamRegistryImpl;
import ca.uhn.fhir.jpa.subscription.match.registry.SubscriptionLoader;
import ca.uhn.fhir.jpa.subscription.match.registry.SubscriptionRegistry;
import ca.uhn.fhir.rest.annotation.Operation;
import ca.uhn.fhir.rest.api.server.RequestDetails;
import org.hl7.fhir.r4.model.IntegerType;
import org.hl7.fhir.r4.model.Parameters;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * System operation {@code POST [base]/$test-reset}: wipes every resource ($expunge with
 * expungeEverything) and then re-syncs HAPI's in-memory caches with the now empty database.
 *
 * <p>A plain {@code $expunge} leaves active Subscriptions (and custom SearchParameters) registered in
 * memory until the next periodic cache sync (about 60 s), so a "reset" test server would keep sending
 * rest-hook notifications for Subscriptions that no longer exist. This operation closes that gap.
 * Test-server only; never expose something like this on a real server.
 */
public class TestResetProvider {

	private static final Logger LOG = LoggerFactory.getLogger(TestResetProvider.class);
	private static final int MAX_ATTEMPTS = 5;

	private final IFhirSystemDao<?, ?> systemDao;
	private final SubscriptionRegistry subscriptionRegistry;
	private final SubscriptionLoader subscriptionLoader;
	private final SearchParamRegistryImpl searchParamRegistry;

	public TestResetProvider(
			IFhirSystemDao<?, ?> systemDao,
			SubscriptionRegistry subscriptionRegistry,
			SubscriptionLoader subscriptionLoader,
			SearchParamRegistryImpl searchParamRegistry) {
		this.systemDao = systemDao;
		this.subscriptionRegistry = subscriptionRegistry;
		this.subscriptionLoader = subscriptionLoader;
		this.searchParamRegistry = searchParamRegistry;
	}

	@Operation(name = "$test-reset", idempotent = false)
	public Parameters testReset(RequestDetails requestDetails) throws InterruptedException {
		long t0 = System.currentTimeMillis();
		int activeBefore = subscriptionRegistry.size();
		int attempt = 1;
		while (true) {
			try {
				systemDao.expunge(new ExpungeOptions().setExpungeEverything(true), requestDetails);
				break;
			} catch (RuntimeException e) {
				// Writes racing with the expunge can trip H2 foreign keys (HTTP 409, HAPI-0550): try again.
				if (attempt >= MAX_ATTEMPTS) {
					throw e;
				}
				LOG.warn("$test-reset: expunge attempt {} failed ({}); retrying", attempt, e.getMessage());
				attempt++;
				Thread.sleep(250L * attempt);
			}
		}
		subscriptionRegistry.unregisterAllSubscriptions();
		subscriptionLoader.forceRefresh();
		searchParamRegistry.forceRefresh();
		long ms = System.currentTimeMillis() - t0;
		LOG.info("$test-reset: everything expunged (attempts: {}), unregistered {} active subscriptions, {} ms",
				attempt, activeBefore, ms);

		Parameters result = new Parameters();
		result.addParameter().setName("attempts").setValue(new IntegerType(attempt));
		result.addParameter().setName("unregisteredSubscriptions").setValue(new IntegerType(activeBefore));
		result.addParameter().setName("activeSubscriptions").setValue(new IntegerType(subscriptionRegistry.size()));
		return result;
	}
}
